"""The embedded corpus the project generates from what every machine has: Python standard-library code
and pydoc prose (stdlib.py), rendered image -> code pairs (vision_pairs.py), instruction chats over both
(instructions.py), and Step-JEPA chats from reasoning data sets (step_data.py). tools/ has a command
for each; stamp.py makes every generator resumable and idempotent."""
