"""What a run costs before it starts: bytes and seconds from shapes alone."""
