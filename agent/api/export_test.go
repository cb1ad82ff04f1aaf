package api

// SetAfterBind installs the hook that runs between bind and rename.
func SetAfterBind(f func(tmpSocket string)) (restore func()) {
	afterBind = f
	return func() { afterBind = nil }
}
