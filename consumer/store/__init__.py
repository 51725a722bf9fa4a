"""State: ``base`` holds the role Protocols, the record types and the written contract;
``memory`` is the in-process fake; ``sqlite`` the embedded default backend."""
