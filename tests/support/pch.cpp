// The translation unit that builds the tests' precompiled header (tests/CMakeLists.txt,
// difftrain_test_pch); the header list is there.
