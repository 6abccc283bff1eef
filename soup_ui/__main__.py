from .cli import main
from .maths import soup

soup.BACKGROUND = False  # one command and done: no kernel compiled for mixes that will not come
soup.exit(main())
