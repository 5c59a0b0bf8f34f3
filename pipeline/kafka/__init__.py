"""A real local Apache Kafka 4.x (no Docker) and topic administration.

- `runtime`: Java 17+ and the broker jars (resolved once with Maven, cached).
- `broker`: `LocalKafka` (one node or a 3-node cluster) and `run_foreground`.
- `admin`: `TopicNames`, `ensure_topics`, `check_copartitioned`.
"""
