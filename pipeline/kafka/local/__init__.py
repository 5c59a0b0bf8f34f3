"""The local Apache Kafka broker for development, tests and the demo.

Its jars come from Maven Central; `LocalKafka` starts and stops the JVM.
"""
