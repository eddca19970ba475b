"""The agent desk: agents, their tokens, and the REST API they work through."""
