from . import soup
from .cli import main

soup.BACKGROUND = False  # one command and done: no kernel compiled for mixes that will not come
soup.exit(main())
