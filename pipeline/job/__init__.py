"""The job layer: files in, files out, resumable (`job.run.run`)."""
