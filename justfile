# Thin aliases over cargo and xtask (the README's commands are plain cargo).

default: test

test:
    cargo test --workspace

ci:
    .ci/run

reproduce *ARGS:
    cargo xtask reproduce {{ARGS}}

quick:
    cargo xtask reproduce --quick

bench:
    cargo bench -p memsteer-benches --bench profile

bench-peers *ARGS:
    cargo xtask bench-peers {{ARGS}}

fixtures:
    cargo xtask fixtures
