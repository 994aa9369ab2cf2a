"""The web layer's own parts that are more than a route: request bodies parsed as they stream in."""
