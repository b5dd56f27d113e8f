"""From a user's files to batches."""
