// A Go net/http backend that honours a method override as gorilla/handlers' method
// override handler does: a POST's X-HTTP-Method-Override header or `_method` form value
// (read by Go's own form parsing: urlencoded or multipart) names PUT, PATCH or DELETE.
// DELETE, PUT or PATCH of /api/items/... is the priced content; the answer says which method
// the request was routed as. Prints its port.
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
)

func overridden(r *http.Request) string {
	if r.Method != http.MethodPost {
		return r.Method
	}
	method := r.Header.Get("X-HTTP-Method-Override")
	if method == "" {
		method = r.FormValue("_method")
	}
	switch method = strings.ToUpper(method); method {
	case http.MethodPut, http.MethodPatch, http.MethodDelete:
		return method
	}
	return r.Method
}

func main() {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		method := overridden(r)
		premium := method != r.Method && strings.HasPrefix(r.URL.Path, "/api/items/")
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"premium": premium, "method": method})
	})
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	_ = http.Serve(listener, handler)
}
