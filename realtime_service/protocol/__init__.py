"""Pure protocol code: frames and their encoding, REST body models, the per-connection session. No I/O."""
