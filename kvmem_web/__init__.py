"""The memory browser's static files (``index.html``, ``app.js``, ``style.css``) and the
API page (``docs.html``, ``docs.js``), which kvmem-http serves at ``/`` and ``/docs``.  No
build step: the files are served as they are."""
