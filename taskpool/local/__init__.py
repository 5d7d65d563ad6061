"""The local engine: main, the TaskGenerator, the Dealer and its workers."""
