"""The conversation store (MongoDB) and the embedded server launcher."""

from gateway.store.mongo import NotFound, Store, StoreError

__all__ = ["NotFound", "Store", "StoreError"]
