"""Generation: the engine, continuous batching, chat, batch generate (layer: infer; imports data, model and
lower)."""
