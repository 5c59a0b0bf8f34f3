"""The broker-free stream core: records in, events and dead letters out.

Plain functions and classes driven by the Kafka worker, offline replay and the tests alike.
Nothing here imports kafka-python (tests/test_layout.py checks it).
"""
