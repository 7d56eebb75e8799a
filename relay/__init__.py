"""asyncio relay shared by agent/ and tunneld/: drives a protocol.Session over sockets."""
