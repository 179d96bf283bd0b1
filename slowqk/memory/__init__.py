"""What a recipe's layout needs per GPU: predicted (:mod:`.predict`, :mod:`.report`) and
measured on CPU (:mod:`.measure`, :mod:`.check`)."""
