"""The OpenAI-compatible server (the ``serve`` extra: Starlette on uvicorn).

``settings`` (ServeConfig), ``protocol`` (the request bodies and answers of the OpenAI API),
``state_cache`` (conversation states kept between turns), ``app`` (routes, generation slots,
start-up) and ``chat.html`` (the chat page it serves at ``/``).
"""
