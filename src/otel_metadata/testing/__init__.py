"""Local, strict fakes of the services this package and its users talk to, on 127.0.0.1."""
