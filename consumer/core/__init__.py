"""The pure core: the Task model, the codec (bytes to events), the fold and the batch
planner, the change type, redaction, signatures, times and backoff. Imports no I/O
library (asyncio, aiohttp, aiokafka, sqlite3, sockets): a test holds that."""
