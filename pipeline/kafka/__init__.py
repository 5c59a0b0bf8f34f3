"""A real local Apache Kafka 4.x (no Docker) and topic administration.

- `runtime`: Java 17+ and the broker jars (resolved once with Maven, cached).
- `broker`: `LocalKafka` (one node or a 3-node cluster); `iotfuse broker` runs one in the
  foreground (pipeline/commands/infra.py).
- `admin`: `TopicNames`, `ensure_topics`, `check_copartitioned`.
"""
