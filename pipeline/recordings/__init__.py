"""Recordings: the file format, reading and writing, summaries, inspection, time-ordered
merging and offline replay. No Kafka here: recording from and replaying to a broker live in
pipeline/kafka/ (record.py, replay.py).
"""
