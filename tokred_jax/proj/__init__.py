"""Self-contained projects built on the library, each in a folder of its own."""
