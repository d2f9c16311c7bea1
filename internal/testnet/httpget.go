package testnet

import (
	"context"
	"net/http"
)

// Get GETs url with http.DefaultClient under ctx on a goroutine of its
// own, for a test that acts while the request is in flight (cancels ctx,
// say); the channel gets the request's error once it is over (nil: an
// answer came, and its body is closed), a bad url's at once.
func Get(ctx context.Context, url string) <-chan error {
	got := make(chan error, 1)
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		got <- err
		return got
	}
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		got <- err
	}()
	return got
}
