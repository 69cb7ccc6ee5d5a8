"""The event-table layout that the reader, the simulator and the predictor share: column names, category indices."""

CLIENT, TIME, TARGET = "client_id", "event_time", "target"
TIME_GAP = "time_gap"  # derived numeric field: log1p(days since the previous event)
PAD, UNKNOWN = 0, 1  # category indices: 0 pads (ptls embeddings use padding_idx=0), 1 is "unknown"
