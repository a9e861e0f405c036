"""probe: a traffic generator that proves a running rawproxy works (SPEC 8).

Standard library only, and nothing imported from rawproxy, so it cannot
share the proxy's bugs.  Layers, pure code at the bottom:

    cli -> scenario -> checks, local (echo, ports, stopsignals), report -> framing, config
"""
