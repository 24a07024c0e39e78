"""Applications on the generation core: the OpenAI-compatible server (``server``, on Starlette and
uvicorn, the ``serve`` extra; its protocol rules in ``openai_api``, settings in ``serve_config``,
conversation states in ``state_cache``, the chat page ``chat.html``) and the hidden-state page
(``hidden_states``)."""
