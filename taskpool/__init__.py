"""taskpool: a fault-tolerant task pool on fork() and POSIX message queues.

Process roles, one module each:

    main.py       main: forks the TaskGenerator and the Dealer, records results
    generator.py  TaskGenerator: puts jobs on the ready queue
    dealer.py     Dealer: send and recv threads
    recovery.py   the Dealer's recovery thread: forks, reaps and replaces workers
    worker.py     a worker: ACK, compute, result
    protocol.py   the wire format, the only module that knows the byte layout
"""

__version__ = "0.1.0"
