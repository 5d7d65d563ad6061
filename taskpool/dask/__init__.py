"""The Dask engine: the same jobs and records on a Dask distributed cluster."""
