"""cluster: configuration, Ray Serve builders, the local launcher and the CLI.

The only package that imports ray.
"""
