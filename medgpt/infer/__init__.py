"""Generation: the engine, chat, batch generate (layer: infer; imports data, model and lower)."""
