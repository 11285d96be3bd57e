module l402gateway/tests/backends/go_override

go 1.22
