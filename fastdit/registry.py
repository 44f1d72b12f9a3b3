"""One registry per kind of thing (attention layers, MLPs, techniques, ...): a name -> constructor table."""


class Registry(dict):
    """Named constructors of one kind; `register` is a decorator, `build` constructs with a clear unknown-name error."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def register(self, name):
        def wrap(obj):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = obj
            return obj
        return wrap

    def build(self, name, *args, **kwargs):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self))}")
        return self[name](*args, **kwargs)
