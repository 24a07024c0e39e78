"""Applications on the generation core: the HTTP server (``server``) and the hidden-state page
(``hidden_states``)."""
