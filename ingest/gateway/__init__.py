"""The metering gateway's edges: the API key file and the durable usage spool."""
