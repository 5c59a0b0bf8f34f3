"""Incidents: a device's events turned into what people act on ("fire at cell-02 since
06:16:16, still burning"), with hysteresis per class. Broker-free.

- `rules`: thresholds and window counts per class, from `[incidents]` settings;
- `tracker`: the state machine, windows in, open/update/close changes out;
- `records`: event values in, `iotfuse.incident/v1` records and saved device states out;
- `stage`: the stage after classification and `IncidentEngine`, the stream engine with it.

The Kafka side (reading saved states back after a restart) is pipeline/kafka/incident_state.py;
the MQTT and webhook sinks are pipeline/sinks/.
"""
