"""The short-polling benchmark's peers: the bare hypercorn floor (`floor.py`) and the Node relay (`node-relay/`)."""
