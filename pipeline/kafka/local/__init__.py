"""The local Apache Kafka broker for development, tests and the demo.

Its jars come from Maven Central (`runtime`); `LocalKafka` (`broker`) starts and stops the
JVMs of the nodes `nodes` configures; `security` makes a secured cluster's CA, certificates,
SCRAM users and ACLs.
"""
