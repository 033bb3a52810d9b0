"""The architectures: one file per model. They expose hook points and import no method."""
