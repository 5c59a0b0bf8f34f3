"""Everything that talks to Kafka: the one place that imports kafka-python.

- `config`: every client's settings (consumer, producer, transactional producer, admin,
  recorder, replayer) built from `[kafka]`, and the one record-size limit;
- `decompress`, `resume`: what every consumer needs from kafka-python beyond settings,
  installed with the consumer settings: record batches decompress to 64 MiB at most, and
  a paused partition's records come back when it resumes;
- `worker`: `iotfuse run`'s loop (consumer, producer, commits) around the broker-free
  `Engine` of pipeline/stream/;
- `producer`, `log_end`, `unreadable`: the worker's bounded producer, end-offset client
  and handling of records the client cannot parse;
- `admin`: topics (`TopicNames`, `ensure_topics`, `check_copartitioned`) and start checks;
- `probe`, `access`, `errors`: a secured cluster's failures named at once: one connection
  tried before any client (TLS, SASL), the ACLs a command needs checked at start, and
  kafka-python's errors a user can fix turned into one-line `UserError`s;
- `record`, `replay`: Kafka to a recording file and back;
- `local/`: a real local Apache Kafka 4.x broker for development, tests and the demo.
"""
