"""HTTP adapters: aiohttp middleware, ASGI middleware, reverse proxy."""
