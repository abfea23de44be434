"""The aiohttp adapter: the only package that imports aiohttp."""
