"""Synthetic worlds written as the files a real country has (imagery, census, truth).

:mod:`.world` (the embedded demo world), :mod:`.settlements` (harder settlement worlds for
accuracy on unseen regions), :mod:`.domain_shift` (other-continent looks), :mod:`.covariates`
(popVAE's covariates derived from a world).
"""
