"""Helpers for the tests and benchmarks, not for serving: shaped network links between network
namespaces (`netns`), free loopback ports (`ports`), prompts and how answers compare (`prompts`),
an ASGI app served in a thread (`asgi`)."""
