"""The OpenAI-compatible server (the ``serve`` extra: Starlette and pydantic on uvicorn).

``settings`` (ServeConfig, importable without the extra), ``protocol`` (the OpenAI request
bodies as pydantic models, and its error object), ``jobs`` (a checked request as the text
to read and how to sample it), ``answers`` (the answer bodies and stream chunks),
``state_cache`` (conversation states kept between turns), ``http`` (the h11 protocol with
its header deadline, routes, CORS, the API key, the bounded body), ``slots`` (generation
slots and the worker-thread events), ``app`` (the endpoints and start-up), ``testing`` (a
server in a background thread) and ``chat.html`` (the chat page it serves at ``/``).
"""
