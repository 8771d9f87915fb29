"""What every stage stands on: models located and loaded safely, atomic file writes, provenance,
folder locks, the user-facing error type, plotting helpers, and the shared-prompt row layout
(one row per prompt and its responses) with the log-probs at the response positions, used by
training's pairs and by scoring alike.

Nothing here imports a stage (data, train, score, report)."""
