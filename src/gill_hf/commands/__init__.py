"""Sub-commands of ``gill-hf``; each module exposes ``register(subparsers)``."""
