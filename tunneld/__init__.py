"""tunneld."""
