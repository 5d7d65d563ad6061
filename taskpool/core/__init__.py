"""Engine-neutral logic: job sources, supervision rules, recording, the journal."""
