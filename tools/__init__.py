"""Developer tools, not part of the installed server."""
